//! load: YAML text → a tree of [`Node`]s that remember where in the file they came from.
//!
//! serde_yaml only knows positions for its own syntax errors, but every semantic error Smelt reports
//! must point at a line and column, so pipelines are read with yaml-rust2's marked event parser
//! into this small tree. The loader is defensive: it refuses files that are too large, duplicate
//! keys, and alias expansions that would blow up (the "billion laughs" document).

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Largest pipeline file accepted; a pipeline is a few kilobytes, anything this big is a mistake.
pub const MAX_FILE_BYTES: usize = 8 << 20;
/// Most nodes a document may expand to once aliases are resolved.
const MAX_NODES: usize = 1_000_000;
/// Deepest nesting accepted.
const MAX_DEPTH: usize = 128;

/// A byte range in the source text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl From<Span> for miette::SourceSpan {
    fn from(span: Span) -> Self {
        (span.offset, span.len).into()
    }
}

/// A YAML value, resolved with the YAML 1.2 core schema.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

/// A mapping key: always a string in a pipeline file.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub span: Span,
}

/// A YAML error with the place it happened.
#[derive(Clone, Debug, PartialEq)]
pub struct YamlError {
    pub message: String,
    pub span: Span,
}

impl Node {
    pub fn new(value: Value, span: Span) -> Self {
        Node { value, span }
    }

    /// The entry of a mapping with this key.
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, v)| v)
    }

    pub fn entries(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// What a value is, in words, for messages like "expected a mapping, found a string".
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The JSON value this node denotes (what stage params are deserialized from).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// The node at exactly this path of keys and indices.
    pub fn lookup(&self, path: &[String]) -> Option<&Node> {
        path.iter()
            .try_fold(self, |node, segment| match &node.value {
                Value::Map(entries) => entries
                    .iter()
                    .find(|(k, _)| &k.name == segment)
                    .map(|e| &e.1),
                Value::Seq(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            })
    }

    /// The node at a JSON-pointer-like path of keys and indices, or the deepest one that exists.
    pub fn at_path<'a>(&'a self, path: &[String]) -> &'a Node {
        let mut node = self;
        for i in 0..=path.len() {
            match self.lookup(&path[..i]) {
                Some(n) => node = n,
                None => break,
            }
        }
        node
    }

    /// The span of the key under which the entry at `path` sits, if any (nicer to point at).
    pub fn key_span_at(&self, path: &[String]) -> Option<Span> {
        let (last, parent) = path.split_last()?;
        let parent = self.at_path(parent);
        parent
            .entries()?
            .iter()
            .find(|(k, _)| &k.name == last)
            .map(|(k, _)| k.span)
    }

    fn count(&self) -> usize {
        1 + match &self.value {
            Value::Seq(items) => items.iter().map(Node::count).sum(),
            Value::Map(entries) => entries.iter().map(|(_, v)| 1 + v.count()).sum(),
            _ => 0,
        }
    }
}

/// Parses one YAML document. Returns the root node and the non-fatal errors (duplicate keys), or
/// the first fatal error.
pub fn parse(text: &str) -> Result<(Node, Vec<YamlError>), YamlError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(YamlError {
            message: format!(
                "the file is {} bytes; a pipeline file may be at most {} bytes",
                text.len(),
                MAX_FILE_BYTES
            ),
            span: Span::default(),
        });
    }
    let mut builder = Builder::new(text);
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = parser.next_token().map_err(|e| YamlError {
            message: e.info().to_string(),
            span: builder.span_at(e.marker(), 1),
        })?;
        if !builder.push(event, mark)? {
            break;
        }
    }
    let root = builder
        .root
        .take()
        .unwrap_or(Node::new(Value::Null, Span::default()));
    Ok((root, builder.errors))
}

/// Parses a scalar written on the command line (`--set a.b=VALUE`) the way YAML would.
pub fn parse_scalar(text: &str) -> Value {
    resolve_plain(text)
}

enum Open {
    Seq(Node, usize),
    Map(Node, usize, Option<Key>),
}

struct Builder<'t> {
    text: &'t str,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    nodes: usize,
    documents: usize,
    errors: Vec<YamlError>,
}

impl<'t> Builder<'t> {
    fn new(text: &'t str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Builder {
            text,
            line_starts,
            stack: Vec::new(),
            anchors: HashMap::new(),
            root: None,
            nodes: 0,
            documents: 0,
            errors: Vec::new(),
        }
    }

    /// The byte span at a marker. Markers are located by line and column: yaml-rust2's `index`
    /// counts bytes, not chars, inside block scalars, so it drifts after non-ASCII text.
    fn span_at(&self, mark: &Marker, len: usize) -> Span {
        let line_start = self
            .line_starts
            .get(mark.line().saturating_sub(1))
            .copied()
            .unwrap_or(self.text.len());
        let line = &self.text[line_start..];
        let column = line
            .char_indices()
            .nth(mark.col())
            .map_or(line.len(), |(i, _)| i);
        let offset = (line_start + column).min(self.text.len());
        Span { offset, len }
    }

    /// The length of a scalar token in the source, kept on its line.
    fn scalar_len(&self, offset: usize, value: &str, style: TScalarStyle) -> usize {
        let rest = &self.text[offset..];
        let line = rest.split('\n').next().unwrap_or("").trim_end_matches('\r');
        let len = match style {
            TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => value.len() + 2,
            TScalarStyle::Plain => value.len(),
            _ => 1,
        };
        len.min(line.len()).max(usize::from(!line.is_empty()))
    }

    /// Feeds one event; returns false once the first document is complete.
    fn push(&mut self, event: Event, mark: Marker) -> Result<bool, YamlError> {
        match event {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(YamlError {
                        message: "a pipeline file holds one YAML document; found a second `---`"
                            .into(),
                        span: self.span_at(&mark, 3),
                    });
                }
            }
            Event::StreamEnd => return Ok(false),
            Event::Scalar(value, style, anchor, tag) => {
                let span = self.span_at(&mark, 0);
                let span = Span {
                    len: self.scalar_len(span.offset, &value, style),
                    ..span
                };
                let is_str_tag = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if style == TScalarStyle::Plain && !is_str_tag {
                    resolve_plain(&value)
                } else {
                    Value::Str(value)
                };
                self.finish(Node::new(value, span), anchor, &mark)?;
            }
            Event::SequenceStart(anchor, _) => {
                self.open(&mark)?;
                let node = Node::new(Value::Seq(Vec::new()), self.span_at(&mark, 1));
                self.stack.push(Open::Seq(node, anchor));
            }
            Event::MappingStart(anchor, _) => {
                self.open(&mark)?;
                let node = Node::new(Value::Map(Vec::new()), self.span_at(&mark, 1));
                self.stack.push(Open::Map(node, anchor, None));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Open::Seq(node, anchor)) | Some(Open::Map(node, anchor, _)) => {
                        (node, anchor)
                    }
                    None => return Ok(true),
                };
                self.finish(node, anchor, &mark)?;
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().ok_or_else(|| YamlError {
                    message: "unknown alias".into(),
                    span: self.span_at(&mark, 1),
                })?;
                let count = node.count();
                self.count_nodes(count, &mark)?;
                // The alias's own position is more useful than the anchor's in messages.
                let node = Node {
                    span: self.span_at(&mark, 1),
                    ..node
                };
                self.attach(node, &mark)?;
            }
            _ => {}
        }
        Ok(true)
    }

    fn open(&mut self, mark: &Marker) -> Result<(), YamlError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(YamlError {
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
                span: self.span_at(mark, 1),
            });
        }
        Ok(())
    }

    fn count_nodes(&mut self, n: usize, mark: &Marker) -> Result<(), YamlError> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(YamlError {
                message: format!(
                    "the document expands to more than {MAX_NODES} values (through aliases?); refusing it"
                ),
                span: self.span_at(mark, 1),
            });
        }
        Ok(())
    }

    fn finish(&mut self, node: Node, anchor: usize, mark: &Marker) -> Result<(), YamlError> {
        self.count_nodes(1, mark)?;
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        self.attach(node, mark)
    }

    /// Places a finished node into its parent (or makes it the root).
    fn attach(&mut self, node: Node, mark: &Marker) -> Result<(), YamlError> {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Seq(parent, _)) => {
                if let Value::Seq(items) = &mut parent.value {
                    items.push(node);
                }
            }
            Some(Open::Map(parent, _, pending_key)) => match pending_key.take() {
                None => {
                    let name = match node.value {
                        Value::Str(s) => s,
                        Value::Int(i) => i.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Null => "null".to_string(),
                        Value::Seq(_) | Value::Map(_) => {
                            return Err(YamlError {
                                message: "mapping keys must be plain strings".into(),
                                span: self.span_at(mark, 1),
                            })
                        }
                    };
                    *pending_key = Some(Key {
                        name,
                        span: node.span,
                    });
                }
                Some(key) => {
                    if let Value::Map(entries) = &mut parent.value {
                        if let Some((first, _)) = entries.iter().find(|(k, _)| k.name == key.name) {
                            let line = line_of(self.text, first.span.offset);
                            self.errors.push(YamlError {
                                message: format!(
                                    "duplicate key `{}` (first defined on line {line})",
                                    key.name
                                ),
                                span: key.span,
                            });
                        } else {
                            entries.push((key, node));
                        }
                    }
                }
            },
        }
        Ok(())
    }
}

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// 1-based (line, column) of a byte offset; the column counts chars.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        line_of(text, offset),
        before[line_start..].chars().count() + 1,
    )
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Int(i);
        }
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Value::Int(i);
        }
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(oct, 8) {
            return Value::Int(i);
        }
    }
    if looks_like_float(unsigned) {
        if let Ok(f) = s.parse::<f64>() {
            return Value::Float(f);
        }
    }
    Value::Str(s.to_string())
}

/// `[0-9]*(\.[0-9]*)?([eE][-+]?[0-9]+)?` with at least one mantissa digit.
fn looks_like_float(s: &str) -> bool {
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut parts = mantissa.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next().unwrap_or("");
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_resolve_like_yaml_core_schema() {
        assert_eq!(resolve_plain("12"), Value::Int(12));
        assert_eq!(resolve_plain("-3"), Value::Int(-3));
        assert_eq!(resolve_plain("1.0e-3"), Value::Float(1.0e-3));
        assert_eq!(resolve_plain("3e-4"), Value::Float(3e-4));
        assert_eq!(resolve_plain("true"), Value::Bool(true));
        assert_eq!(resolve_plain("~"), Value::Null);
        assert_eq!(resolve_plain("1.2.3"), Value::Str("1.2.3".into()));
        assert_eq!(resolve_plain("inf"), Value::Str("inf".into()));
        assert_eq!(resolve_plain("e5"), Value::Str("e5".into()));
    }

    #[test]
    fn spans_point_at_keys_and_values() {
        let text = "a: 1\nbé:\n  c: 'x y'\n";
        let (root, errors) = parse(text).unwrap();
        assert!(errors.is_empty());
        let c = root.get("bé").unwrap().get("c").unwrap();
        assert_eq!(c.value, Value::Str("x y".into()));
        assert_eq!(line_col(text, c.span.offset), (3, 6));
        assert_eq!(&text[c.span.offset..c.span.offset + c.span.len], "'x y'");
        let key = root.key_span_at(&["bé".into()]).unwrap();
        assert_eq!(&text[key.offset..key.offset + key.len], "bé");
    }

    #[test]
    fn spans_stay_right_after_non_ascii_block_scalars() {
        let text = "a: |\n  naïve café 日本\nb: x\n";
        let (root, _) = parse(text).unwrap();
        let b = root.get("b").unwrap();
        assert_eq!(&text[b.span.offset..b.span.offset + b.span.len], "x");
        assert_eq!(line_col(text, b.span.offset), (3, 4));
    }

    #[test]
    fn duplicate_keys_are_reported_with_both_lines() {
        let (_, errors) = parse("a: 1\nb: 2\na: 3\n").unwrap();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.contains("first defined on line 1"),
            "{:?}",
            errors
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let err = parse(&text).unwrap_err();
        assert!(
            err.message.contains("expands to more than"),
            "{}",
            err.message
        );
    }

    #[test]
    fn aliases_expand() {
        let (root, _) = parse("base: &b {x: 1}\nother: *b\n").unwrap();
        assert_eq!(
            root.get("other").unwrap().get("x").unwrap().value,
            Value::Int(1)
        );
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.span.offset > 0);
    }
}
