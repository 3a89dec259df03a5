//! Reading documents from local files: plain text (a file, a paragraph or a line per document),
//! JSON lines (a field per line, or chat / preference records) and CSV (a column per row).
//!
//! Memory stays bounded: files are streamed line by line, and a line or document longer than
//! `max_document_bytes` is skipped and counted without being held in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::records::{Message, Record};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Text,
    Jsonl,
    Csv,
}

/// How plain text files are cut into documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SplitOn {
    /// The whole file is one document.
    #[default]
    File,
    /// Paragraphs separated by blank lines.
    Paragraph,
    /// Every non-empty line.
    Line,
    /// Runs of whole lines of about 4 KB, newlines kept (as `\n`): the file's text is its
    /// documents joined, as character-level language modelling wants it.
    Chunk,
}

/// Target size of a `chunk` document.
const CHUNK_BYTES: usize = 4096;

/// What to do with bytes that are not UTF-8.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InvalidUtf8 {
    /// Stop with an error naming the file and line.
    #[default]
    Error,
    /// Skip the document and count it in the manifest.
    Skip,
}

/// How to turn a file's bytes into documents.
#[derive(Clone, Debug)]
pub struct ParseOptions {
    /// `None`: from the file extension (`.jsonl`/`.json` → jsonl, `.csv` → csv, else text).
    pub format: Option<Format>,
    pub field: String,
    pub split_on: SplitOn,
    pub invalid_utf8: InvalidUtf8,
    pub max_document_bytes: u64,
}

/// Documents skipped, by reason.
pub type Skips = BTreeMap<String, u64>;

/// Reads one file, calling `emit` for each document; `name` is how the file is shown in ids,
/// provenance and errors. Returns the skip counts.
pub fn read_file(
    path: &Path,
    name: &str,
    options: &ParseOptions,
    emit: &mut dyn FnMut(Record) -> io::Result<()>,
) -> Result<Skips, String> {
    let fail = |e: io::Error| format!("{name}: {e}");
    let file = File::open(path).map_err(fail)?;
    let size = file.metadata().map_err(fail)?.len();
    let format = options.format.unwrap_or_else(|| infer_format(path));
    read(file, size, format, name, options, emit)
}

/// [`read_file`] on any input of `size` bytes in `format` (`options.format` is not consulted).
pub fn read(
    input: impl Read,
    size: u64,
    format: Format,
    name: &str,
    options: &ParseOptions,
    emit: &mut dyn FnMut(Record) -> io::Result<()>,
) -> Result<Skips, String> {
    let mut reader = Reader {
        name,
        options,
        skips: Skips::new(),
        emit,
    };
    if size == 0 {
        reader.skip("empty_file");
        return Ok(reader.skips);
    }
    let input = BufReader::with_capacity(1 << 16, input);
    match (format, options.split_on) {
        (Format::Text, SplitOn::File) => reader.whole_file(input, size)?,
        (Format::Text, SplitOn::Chunk) => reader.chunks(input)?,
        (Format::Text, split) => reader.text_lines(input, split == SplitOn::Paragraph)?,
        (Format::Jsonl, _) => reader.jsonl(input)?,
        (Format::Csv, _) => reader.csv(input)?,
    }
    Ok(reader.skips)
}

pub fn infer_format(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "json" | "ndjson") => Format::Jsonl,
        Some("csv") => Format::Csv,
        _ => Format::Text,
    }
}

/// Files matching `pattern` (relative to `dir`), sorted, as paths relative to `dir`.
pub fn expand_glob(dir: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    // The pipeline's folder is literal text, even if its name holds `[` or `*`.
    let dir_text = dir
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", dir.display()))?;
    let full = Path::new(&glob::Pattern::escape(dir_text)).join(pattern);
    let full = full
        .to_str()
        .ok_or_else(|| format!("glob `{pattern}` is not UTF-8"))?;
    let entries = glob::glob(full).map_err(|e| format!("glob `{pattern}`: {e}"))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("glob `{pattern}`: {e}"))?;
        if path.is_file() {
            files.push(
                path.strip_prefix(dir)
                    .map(Path::to_path_buf)
                    .unwrap_or(path),
            );
        }
    }
    if files.is_empty() {
        return Err(format!(
            "glob `{pattern}` matches no file (relative to {})",
            dir.display()
        ));
    }
    files.sort();
    Ok(files)
}

struct Reader<'a> {
    name: &'a str,
    options: &'a ParseOptions,
    skips: Skips,
    emit: &'a mut dyn FnMut(Record) -> io::Result<()>,
}

/// One line read with a length limit.
enum Line {
    Text,
    TooLong,
    End,
}

impl Reader<'_> {
    fn skip(&mut self, reason: &str) {
        *self.skips.entry(reason.to_string()).or_default() += 1;
    }

    fn emit(&mut self, record: Record) -> Result<(), String> {
        (self.emit)(record).map_err(|e| format!("writing documents: {e}"))
    }

    /// Decodes UTF-8 per the policy: `Ok(None)` when the document is skipped.
    fn decode(&mut self, bytes: Vec<u8>, at: &str) -> Result<Option<String>, String> {
        match String::from_utf8(bytes) {
            Ok(text) => Ok(Some(text)),
            Err(e) => match self.options.invalid_utf8 {
                InvalidUtf8::Error => Err(format!(
                    "{at}: invalid UTF-8 at byte {} (set `invalid_utf8: skip` to skip such documents)",
                    e.utf8_error().valid_up_to()
                )),
                InvalidUtf8::Skip => {
                    self.skip("invalid_utf8");
                    Ok(None)
                }
            },
        }
    }

    fn text_document(&mut self, id: String, text: String) -> Result<(), String> {
        if text.trim().is_empty() {
            self.skip("empty");
            return Ok(());
        }
        let source = self.name.to_string();
        self.emit(Record::text(id, text, &source))
    }

    fn whole_file(&mut self, input: impl Read, size: u64) -> Result<(), String> {
        if size > self.options.max_document_bytes {
            self.skip("too_long");
            return Ok(());
        }
        let limit = self.options.max_document_bytes;
        let mut bytes = Vec::with_capacity(size as usize);
        // The file may have grown since it was measured: never hold more than the limit.
        input
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{}: {e}", self.name))?;
        if bytes.len() as u64 > limit {
            self.skip("too_long");
            return Ok(());
        }
        if let Some(text) = self.decode(bytes, self.name)? {
            self.text_document(self.name.to_string(), text)?;
        }
        Ok(())
    }

    /// Reads up to the next newline into `buf` (without it), refusing to hold more than the limit.
    fn read_line(&self, input: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
        buf.clear();
        let limit = self.options.max_document_bytes as usize;
        let mut too_long = false;
        let mut read_any = false;
        loop {
            let available = input.fill_buf()?;
            if available.is_empty() {
                return Ok(match (read_any, too_long) {
                    (false, _) => Line::End,
                    (true, true) => Line::TooLong,
                    (true, false) => Line::Text,
                });
            }
            read_any = true;
            let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], Some(i + 1)),
                None => (available, None),
            };
            if !too_long && buf.len() + chunk.len() > limit {
                too_long = true;
                buf.clear();
            }
            if !too_long {
                buf.extend_from_slice(chunk);
            }
            let used = done.unwrap_or(chunk.len());
            input.consume(used);
            if done.is_some() {
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                return Ok(if too_long { Line::TooLong } else { Line::Text });
            }
        }
    }

    fn text_lines(&mut self, mut input: impl BufRead, paragraphs: bool) -> Result<(), String> {
        let mut buf = Vec::new();
        let mut paragraph: Vec<u8> = Vec::new();
        let mut paragraph_too_long = false;
        let mut paragraph_start = 1;
        let mut count = 0u64;
        for number in 1.. {
            let line = self
                .read_line(&mut input, &mut buf)
                .map_err(|e| format!("{}:{number}: {e}", self.name))?;
            let at = format!("{}:{number}", self.name);
            let blank = matches!(line, Line::Text) && buf.iter().all(u8::is_ascii_whitespace);
            if paragraphs {
                if matches!(line, Line::End) || blank {
                    if paragraph_too_long {
                        self.skip("too_long");
                    } else if !paragraph.is_empty() {
                        count += 1;
                        let bytes = std::mem::take(&mut paragraph);
                        let at = format!("{}:{paragraph_start} (paragraph)", self.name);
                        if let Some(text) = self.decode(bytes, &at)? {
                            self.text_document(format!("{}#p{count}", self.name), text)?;
                        }
                    }
                    paragraph.clear();
                    paragraph_too_long = false;
                } else if matches!(line, Line::TooLong)
                    || paragraph.len() + buf.len() + 1 > self.options.max_document_bytes as usize
                {
                    paragraph_too_long = true;
                    paragraph.clear();
                } else if !paragraph_too_long {
                    if paragraph.is_empty() {
                        paragraph_start = number;
                    } else {
                        paragraph.push(b'\n');
                    }
                    paragraph.extend_from_slice(&buf);
                }
            } else {
                match line {
                    Line::TooLong => self.skip("too_long"),
                    Line::Text if blank => {}
                    Line::Text => {
                        if let Some(text) = self.decode(buf.clone(), &at)? {
                            self.text_document(format!("{}:{number}", self.name), text)?;
                        }
                    }
                    Line::End => {}
                }
            }
            if matches!(line, Line::End) {
                break;
            }
        }
        Ok(())
    }

    fn chunks(&mut self, mut input: impl BufRead) -> Result<(), String> {
        let (mut buf, mut chunk) = (Vec::new(), Vec::new());
        let (mut start, mut count) = (1, 0u64);
        for number in 1.. {
            let line = self
                .read_line(&mut input, &mut buf)
                .map_err(|e| format!("{}:{number}: {e}", self.name))?;
            match line {
                Line::TooLong => self.skip("too_long"),
                Line::Text => {
                    chunk.extend_from_slice(&buf);
                    chunk.push(b'\n');
                }
                Line::End => {}
            }
            let end = matches!(line, Line::End);
            if (chunk.len() >= CHUNK_BYTES || end) && !chunk.is_empty() {
                count += 1;
                let at = format!("{}:{start} (chunk)", self.name);
                if let Some(text) = self.decode(std::mem::take(&mut chunk), &at)? {
                    self.text_document(format!("{}#c{count}", self.name), text)?;
                }
                start = number + 1;
            }
            if end {
                break;
            }
        }
        Ok(())
    }

    fn jsonl(&mut self, mut input: impl BufRead) -> Result<(), String> {
        let mut buf = Vec::new();
        for number in 1.. {
            let at = format!("{}:{number}", self.name);
            match self
                .read_line(&mut input, &mut buf)
                .map_err(|e| format!("{at}: {e}"))?
            {
                Line::End => break,
                Line::TooLong => self.skip("too_long"),
                Line::Text if buf.iter().all(u8::is_ascii_whitespace) => {}
                Line::Text => {
                    let Some(line) = self.decode(buf.clone(), &at)? else {
                        continue;
                    };
                    let record = self.json_record(&line, &at)?;
                    if record.text.trim().is_empty() {
                        self.skip("empty");
                        continue;
                    }
                    self.emit(record)?;
                }
            }
        }
        Ok(())
    }

    /// A JSON object as a record: chat (`messages`), preference (`prompt`, `chosen`,
    /// `rejected`), or text from the configured field.
    fn json_record(&self, line: &str, at: &str) -> Result<Record, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{at}: not JSON: {e}"))?;
        let object = value
            .as_object()
            .ok_or_else(|| format!("{at}: expected a JSON object"))?;
        // A record's own string `id` is kept; otherwise it is named by its file and line.
        let id = object
            .get("id")
            .and_then(|v| v.as_str())
            .map_or_else(|| at.to_string(), str::to_string);
        if let Some(messages) = object.get("messages") {
            let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
                format!("{at}: `messages` must be a list of {{role, content}}: {e}")
            })?;
            return Ok(Record::chat(id, messages, self.name));
        }
        let text_of = |key: &str| object.get(key).and_then(|v| v.as_str()).map(str::to_string);
        if let (Some(prompt), Some(chosen), Some(rejected)) =
            (text_of("prompt"), text_of("chosen"), text_of("rejected"))
        {
            return Ok(Record::preference(id, prompt, chosen, rejected, self.name));
        }
        let field = &self.options.field;
        match object.get(field) {
            Some(serde_json::Value::String(text)) => Ok(Record::text(id, text.clone(), self.name)),
            Some(other) => Err(format!(
                "{at}: field `{field}` must be a string, found {other}"
            )),
            None => Err(format!(
                "{at}: no field `{field}` (set `field:` to the key that holds the text)"
            )),
        }
    }

    /// CSV with a header row; the configured column is the text. Built on csv-core so that
    /// memory stays bounded: cells are streamed through a small buffer, only the text column
    /// is kept, and a text cell over `max_document_bytes` is counted and skipped whatever its
    /// size (the `csv` crate would hold a whole row, however long, in memory).
    fn csv(&mut self, mut input: impl BufRead) -> Result<(), String> {
        let mut rows = CsvRows::new(self.options.max_document_bytes as usize);
        let Some(headers) = rows
            .next_row(&mut input, None)
            .map_err(|e| self.csv_error(e))?
        else {
            return Ok(());
        };
        let field = &self.options.field;
        let names: Vec<String> = headers
            .cells
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let h = String::from_utf8_lossy(h.as_deref().unwrap_or_default());
                // A UTF-8 byte order mark is not part of the first name.
                if i == 0 {
                    h.trim_start_matches('\u{feff}')
                } else {
                    &h
                }
                .to_string()
            })
            .collect();
        let column = names.iter().position(|h| h == field).ok_or_else(|| {
            format!(
                "{}: no column `{field}`; columns: {}",
                self.name,
                names.join(", ")
            )
        })?;
        while let Some(row) = rows
            .next_row(&mut input, Some(column))
            .map_err(|e| self.csv_error(e))?
        {
            let at = format!("{}:{}", self.name, row.line);
            if row.fields != names.len() {
                return Err(format!(
                    "{at}: the row has {} field(s) where the header has {}",
                    row.fields,
                    names.len()
                ));
            }
            match row.cells.into_iter().next().flatten() {
                None => self.skip("too_long"),
                Some(cell) => {
                    if let Some(text) = self.decode(cell, &at)? {
                        self.text_document(at, text)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn csv_error(&self, e: io::Error) -> String {
        format!("{}: {e}", self.name)
    }
}

/// One CSV row as [`CsvRows`] reads it.
struct CsvRow {
    /// The line the row starts on (quoted cells may span lines).
    line: u64,
    /// How many fields the row has.
    fields: usize,
    /// The kept cells: every cell for the header, else only the wanted column. `None` for a
    /// cell longer than the limit.
    cells: Vec<Option<Vec<u8>>>,
}

/// Streams CSV rows through csv-core, keeping at most `limit` bytes of any cell.
struct CsvRows {
    parser: csv_core::Reader,
    limit: usize,
    at_end: bool,
}

impl CsvRows {
    fn new(limit: usize) -> Self {
        CsvRows {
            parser: csv_core::Reader::new(),
            limit,
            at_end: false,
        }
    }

    /// The next row, keeping only cell `keep` (every cell when `None`); `None` at the end.
    fn next_row(
        &mut self,
        input: &mut impl BufRead,
        keep: Option<usize>,
    ) -> io::Result<Option<CsvRow>> {
        let mut chunk = [0u8; 8192];
        let mut row = CsvRow {
            line: self.parser.line(),
            fields: 0,
            cells: Vec::new(),
        };
        let mut cell: Option<Vec<u8>> = Some(Vec::new());
        loop {
            if self.at_end {
                return Ok(None);
            }
            let available = input.fill_buf()?;
            let (result, read, written) = self.parser.read_field(available, &mut chunk);
            input.consume(read);
            let wanted = keep.is_none_or(|k| k == row.fields);
            if wanted {
                if let Some(bytes) = &mut cell {
                    if bytes.len() + written > self.limit {
                        cell = None;
                    } else {
                        bytes.extend_from_slice(&chunk[..written]);
                    }
                }
            }
            match result {
                csv_core::ReadFieldResult::InputEmpty | csv_core::ReadFieldResult::OutputFull => {}
                csv_core::ReadFieldResult::Field { record_end } => {
                    if wanted {
                        row.cells.push(cell.take());
                    }
                    row.fields += 1;
                    cell = Some(Vec::new());
                    if record_end {
                        return Ok(Some(row));
                    }
                }
                csv_core::ReadFieldResult::End => self.at_end = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(split_on: SplitOn) -> ParseOptions {
        ParseOptions {
            format: None,
            field: "text".into(),
            split_on,
            invalid_utf8: InvalidUtf8::Error,
            max_document_bytes: 1000,
        }
    }

    fn read(
        name: &str,
        bytes: &[u8],
        options: &ParseOptions,
    ) -> Result<(Vec<Record>, Skips), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let mut records = Vec::new();
        let skips = read_file(&path, name, options, &mut |r| {
            records.push(r);
            Ok(())
        })?;
        Ok((records, skips))
    }

    fn texts(records: &[Record]) -> Vec<&str> {
        records.iter().map(|r| r.text.as_str()).collect()
    }

    #[test]
    fn text_splits_by_file_paragraph_and_line() {
        let body = b"one\ntwo\n\n\nthree\r\n";
        let (r, _) = read("a.txt", body, &options(SplitOn::File)).unwrap();
        assert_eq!(texts(&r), ["one\ntwo\n\n\nthree\r\n"]);
        let (r, _) = read("a.txt", body, &options(SplitOn::Paragraph)).unwrap();
        assert_eq!(texts(&r), ["one\ntwo", "three"]);
        assert_eq!(r[1].id, "a.txt#p2");
        let (r, _) = read("a.txt", body, &options(SplitOn::Line)).unwrap();
        assert_eq!(texts(&r), ["one", "two", "three"]);
        assert_eq!(
            (r[2].id.as_str(), r[2].source.as_str()),
            ("a.txt:5", "a.txt")
        );
    }

    #[test]
    fn jsonl_reads_fields_chat_and_preferences_and_points_at_bad_lines() {
        let body = b"{\"text\": \"hello\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n";
        let (r, _) = read("d.jsonl", body, &options(SplitOn::File)).unwrap();
        assert_eq!(texts(&r), ["hello", "user: hi", "p"]);
        assert_eq!(r[1].id, "d.jsonl:3");
        assert_eq!(r[2].chosen.as_deref(), Some("c"));
        let (own, _) = read(
            "d.jsonl",
            b"{\"id\": \"doc-7\", \"text\": \"x\"}\n",
            &options(SplitOn::File),
        )
        .unwrap();
        assert_eq!(own[0].id, "doc-7", "a record's own id is kept");
        let err = read(
            "d.jsonl",
            b"{\"text\": \"ok\"}\nnot json\n",
            &options(SplitOn::File),
        )
        .unwrap_err();
        assert!(err.starts_with("d.jsonl:2: not JSON"), "{err}");
        let err = read("d.jsonl", b"{\"body\": \"x\"}\n", &options(SplitOn::File)).unwrap_err();
        assert!(err.starts_with("d.jsonl:1: no field `text`"), "{err}");
    }

    #[test]
    fn csv_reads_a_column() {
        let (r, _) = read(
            "t.csv",
            b"id,text\n1,\"a, b\"\n2,c\n",
            &options(SplitOn::File),
        )
        .unwrap();
        assert_eq!(texts(&r), ["a, b", "c"]);
        assert_eq!(r[1].id, "t.csv:3");
        let err = read("t.csv", b"id,body\n1,x\n", &options(SplitOn::File)).unwrap_err();
        assert!(err.contains("no column `text`; columns: id, body"), "{err}");
    }

    #[test]
    fn chunks_keep_every_line_and_newline() {
        let text: String = (0..2000)
            .map(|i| format!("line {i}\n"))
            .chain(["\n".into(), "last".into()])
            .collect();
        let (r, _) = read("t.txt", text.as_bytes(), &options(SplitOn::Chunk)).unwrap();
        assert!(r.len() > 3, "{} chunks", r.len());
        assert!(r.iter().all(|d| d.text.len() < 4096 + 16));
        assert_eq!(
            r.iter().map(|d| d.text.as_str()).collect::<String>(),
            format!("{text}\n")
        );
    }

    #[test]
    fn csv_cells_are_bounded_and_rows_checked() {
        // Limit 1000 bytes: a 5 MB cell in another column costs nothing, a 5 MB text cell is
        // counted and skipped, and the rows after both still read with their line numbers.
        let big = "x".repeat(5 << 20);
        let body = format!("\u{feff}text,note\n\"multi\nline\",{big}\n{big},n\nlast,\"q\"\"q\"\n");
        let (r, skips) = read("b.csv", body.as_bytes(), &options(SplitOn::File)).unwrap();
        assert_eq!(texts(&r), ["multi\nline", "last"]);
        assert_eq!(r[0].id, "b.csv:2");
        assert_eq!(r[1].id, "b.csv:5");
        assert_eq!(skips["too_long"], 1);
        let err = read("r.csv", b"text,note\na,b\nc\n", &options(SplitOn::File)).unwrap_err();
        assert_eq!(
            err,
            "r.csv:3: the row has 1 field(s) where the header has 2"
        );
    }

    #[test]
    fn invalid_utf8_errors_or_is_counted() {
        let body = b"good\nbad \xff\nfine\n";
        let err = read("u.txt", body, &options(SplitOn::Line)).unwrap_err();
        assert!(err.starts_with("u.txt:2: invalid UTF-8 at byte 4"), "{err}");
        let skip = ParseOptions {
            invalid_utf8: InvalidUtf8::Skip,
            ..options(SplitOn::Line)
        };
        let (r, skips) = read("u.txt", body, &skip).unwrap();
        assert_eq!(texts(&r), ["good", "fine"]);
        assert_eq!(skips["invalid_utf8"], 1);
    }

    #[test]
    fn long_lines_and_empty_files_are_counted_not_loaded() {
        let mut body = b"short\n".to_vec();
        body.extend(std::iter::repeat_n(b'x', 5000));
        body.extend(b"\nlast\n");
        let (r, skips) = read("l.txt", &body, &options(SplitOn::Line)).unwrap();
        assert_eq!(texts(&r), ["short", "last"]);
        assert_eq!(skips["too_long"], 1);
        let (r, skips) = read("l.txt", &body, &options(SplitOn::File)).unwrap();
        assert!(r.is_empty());
        assert_eq!(skips["too_long"], 1);
        let (r, skips) = read("e.txt", b"", &options(SplitOn::File)).unwrap();
        assert!(r.is_empty());
        assert_eq!(skips["empty_file"], 1);
    }

    #[test]
    fn glob_characters_in_the_folder_name_are_literal() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("exp[1]");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("a.txt"), "x").unwrap();
        assert_eq!(
            expand_glob(&folder, "*.txt").unwrap(),
            [PathBuf::from("a.txt")]
        );
    }

    #[test]
    fn globs_are_sorted_relative_and_must_match() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        for f in ["d/b.txt", "d/a.txt", "d/c.md"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        assert_eq!(
            expand_glob(dir.path(), "d/*.txt").unwrap(),
            [PathBuf::from("d/a.txt"), PathBuf::from("d/b.txt")]
        );
        assert!(expand_glob(dir.path(), "d/*.csv")
            .unwrap_err()
            .contains("matches no file"));
    }
}
